"""How good a representation is: the metrics (`metrics`), the evaluation harness every family's sections run in
(`evaluation`), the pictures harness (`pictures`) and the rate–distortion baselines (`rate_distortion`). It builds on
`core` only, so the models, formats and stages may all use it."""

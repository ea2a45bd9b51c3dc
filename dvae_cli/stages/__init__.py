"""The pipeline's stages, one module each: prepare, train, encode, decode, evaluate, render, prior, sample,
compare, import_reference. Peers that never import each other and talk only through the files in `formats`.

Every stage has one shape: `run(params, family, paths, ...)` (no `family` where the stage is not per family:
prepare, decode, import_reference), with `paths` a record whose `of(...)` fills in the pipeline's default paths
(`core.layout`, dvc.yaml's), and a result record for the command to show."""

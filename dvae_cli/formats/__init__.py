"""The files stages exchange, one module each: the dataset, the codes file, the model folder, the checkpoint."""

"""Infrastructure every room shares: errors, atomic files, progress, the typed config schema, runtime (device,
precision, memory format), distributed helpers, splits, the pipeline's file layout, and picture building blocks."""

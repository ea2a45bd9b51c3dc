"""Infrastructure every stage shares: errors, atomic files, progress, runtime (device, precision, memory format),
distributed helpers, typed config schema, metric functions and picture building blocks."""

"""The pipeline's stages, one module each (prepare, train, encode, decode, evaluate, render): peers that never
import each other and talk only through the files in `formats`."""

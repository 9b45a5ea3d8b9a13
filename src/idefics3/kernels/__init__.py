"""Hand-written kernels that speed up the model from outside: the model files do not know about them."""

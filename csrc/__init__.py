"""C++ and CUDA sources of AGIP's native backends, installed as package data
(``agip.csrc``) and compiled on first use by ``agip.backends.cpp`` / ``agip.backends.cuda``."""

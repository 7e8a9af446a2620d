"""tfmir: medical image retrieval with TensorFlow and Keras."""

__version__ = "0.1.0"

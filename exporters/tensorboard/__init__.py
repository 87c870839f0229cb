"""TensorBoard event files, read into the neutral schema (``tensorboard:///PATH``)."""

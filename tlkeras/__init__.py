"""tlkeras: transfer learning from ImageNet bases with Keras and tf.distribute.

Run `python -m tlkeras.train --help`. Importing the package does nothing heavy:
TensorFlow is imported by the modules that need it.
"""

__version__ = "0.2.0"

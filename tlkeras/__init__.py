"""tlkeras: VGG16 transfer learning on CIFAR-10 with Keras and tf.distribute.

Run `python -m tlkeras.train --help`. Importing the package does nothing heavy:
TensorFlow is imported by the modules that need it.
"""

__version__ = "0.1.0"

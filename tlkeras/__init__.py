"""tlkeras: VGG16 transfer learning on CIFAR-10 with Keras and tf.distribute.

Run `python -m tlkeras.train --help`. Importing the package does nothing heavy:
TensorFlow is imported by the modules that need it.
"""

__version__ = "0.1.0"

# CIFAR-10's label order (tfds `label` feature); the index is the model's class output.
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

"""A stock LiteRT client, no tlkeras code: MediaPipe Tasks ImageClassifier on a .tflite.

    <mediapipe venv>/bin/python tests/stock_client.py model.tflite a.png b.png

Prints one JSON line per image: {"file", "index", "name", "score"} of the top category.
Runs in a venv of its own (mediapipe pins flatbuffers, absl-py and opencv; never install it
beside TensorFlow); tests/test_litert.py calls it when that venv exists.
"""

import json
import sys

import mediapipe as mp
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions


def main(model: str, files: list[str]) -> None:
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for file in files:
            top = classifier.classify(mp.Image.create_from_file(file)).classifications[0].categories[0]
            print(json.dumps({"file": file, "index": top.index, "name": top.category_name, "score": top.score}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

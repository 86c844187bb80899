"""The README's example runs as written, on every backend."""

import re
from pathlib import Path

import keras
import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def example_code():
    """The Python block between the README's `example` snippet markers (the
    docs' home page includes the same block)."""
    text = README.read_text()
    section = re.search(r"\[start:example\](.*?)\[end:example\]", text, re.S)
    assert section, "README.md lost its example snippet markers"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "README.md's example has no Python block"
    return block.group(1)


def test_readme_example_runs_and_folds_to_the_same_predictions(rng):
    x_train = rng.normal(size=(120, 784)).astype("float32")
    y_train = rng.integers(0, 10, size=120)
    namespace = {"x_train": x_train, "y_train": y_train}
    exec(compile(example_code(), str(README), "exec"), namespace)
    model, folded = namespace["model"], namespace["folded"]
    bn = [layer for layer in model.layers if "batch_norm" in layer.name]
    assert len(bn) == 1
    # recompute_statistics replaced the EMA with the data's own statistics:
    # the pre-activations' mean and (biased) variance over x_train[:6000].
    dense = model.layers[0]
    h = keras.ops.convert_to_numpy(dense(x_train)).astype(np.float64)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn[0].moving_mean), h.mean(0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn[0].moving_variance), h.var(0), rtol=1e-3
    )
    # The folded model has no BN layer left and predicts the same.
    assert not any("batch_norm" in layer.name for layer in folded.layers)
    np.testing.assert_allclose(
        folded.predict(x_train, verbose=0),
        model.predict(x_train, verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )

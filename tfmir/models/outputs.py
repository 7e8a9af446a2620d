"""Which output of a deployable model retrieval, hashing and segmentation read.

Most tfmir models have one output, an embedding (B, D). A model may instead return a dict of
named outputs; these names mean something to every consumer (evaluators, export, index,
search, serve):

- `EMBEDDING` ("embedding"): float (B, D) vectors compared by cosine, dot or L2;
- `CODE` ("code"): float (B, k) values, tanh in (-1, 1), whose signs are k hash bits (positive
  -> 1, else 0, as `tfmir.index.sign_codes`), compared by Hamming distance;
- `MASK` ("mask"): float (B, S, S, 1) foreground probabilities at the model's input size;
- `PROBABILITY` ("probability"): float (B, 1) probability of a binary classifier's positive
  class (paper 003's melanoma);
- "gram_1" .. "gram_L" (`gram_output_name`): float (B, C_l, C_l) Gram matrices of L style
  layers, which make a model a style model: its index also stores them (and its masks), and
  search can rank by style (`tfmir.similarity`).

`retrieval_output` says which output to retrieve with, and how: a single-output model's one
output, or a dict model's "code" (kind "hash"), else its "embedding" (kind "float").
`select_output` picks a named output from a model call; a single-output model's one output
answers every name (it is the embedding of an embedder, the mask of a segmenter).

Example:

```python
name, kind = retrieval_output(hasher)        # ("code", "hash")
codes = select_output(hasher(images), name)  # (B, k)
if has_mask(hasher):
    masks = select_output(hasher(images), MASK)
```
"""

from __future__ import annotations

from collections.abc import Mapping

EMBEDDING = "embedding"
CODE = "code"
MASK = "mask"
PROBABILITY = "probability"
GRAM_PREFIX = "gram_"
FLOAT = "float"
HASH = "hash"
OUTPUT_KINDS = (FLOAT, HASH)


def output_names(model) -> tuple[str, ...]:
    """The keys of a model's dict of outputs, sorted; () for a model with one output.

    Args:
        model: a functional (or Sequential) `keras.Model`.

    Returns:
        The output names, or () when the model returns a single tensor.
    """
    try:
        structure = model.output
    except (AttributeError, ValueError):  # a Sequential model that was never called
        return ()
    return tuple(sorted(structure)) if isinstance(structure, Mapping) else ()


def retrieval_output(model) -> tuple[str, str]:
    """The output to retrieve with and its kind: `(name, "float")` or `(CODE, "hash")`.

    A single-output model gives `(EMBEDDING, "float")`. A dict model gives `(CODE, "hash")` when
    it has a "code" output (a model that outputs a hash code is a hashing model, whatever else
    it outputs), else `(EMBEDDING, "float")` when it has an "embedding" output.

    Args:
        model: the deployable model.

    Returns:
        (output name, kind), kind in `OUTPUT_KINDS`.

    Raises:
        ValueError: a dict model with neither a "code" nor an "embedding" output.
    """
    names = output_names(model)
    if CODE in names:
        return CODE, HASH
    if not names or EMBEDDING in names:
        return EMBEDDING, FLOAT
    raise ValueError(f"the model has no output to retrieve with: expected an {EMBEDDING!r} or a "
                     f"{CODE!r} output. Received a model with outputs {list(names)}")


def gram_output_name(level: int) -> str:
    """The name of the Gram matrix output of style layer `level` (1-based): "gram_<level>"."""
    return f"{GRAM_PREFIX}{int(level)}"


def gram_outputs(model) -> tuple[str, ...]:
    """The model's Gram matrix outputs in layer order ("gram_1", "gram_2", ...); () for none."""
    names = [name for name in output_names(model)
             if name.startswith(GRAM_PREFIX) and name[len(GRAM_PREFIX):].isdigit()]
    return tuple(sorted(names, key=lambda name: int(name[len(GRAM_PREFIX):])))


def has_mask(model) -> bool:
    """Whether the model has a "mask" output (a single-output model has none by name)."""
    return MASK in output_names(model)


def select_output(outputs, name: str):
    """The output `name` of a model call; a single tensor answers every name.

    Args:
        outputs: what the model returned: a tensor or a dict of tensors.
        name: the output wanted (`EMBEDDING`, `CODE`, `MASK`, ...).

    Returns:
        The selected tensor.

    Raises:
        ValueError: a dict without `name`; the message lists its keys.
    """
    if not isinstance(outputs, Mapping):
        return outputs
    if name not in outputs:
        raise ValueError(f"the model has no {name!r} output. Received a model with outputs "
                         f"{sorted(outputs)}")
    return outputs[name]


def output_shape(model, name: str) -> tuple:
    """The shape of output `name` of `model` (batch dimension None), as `select_output` picks it.

    Raises:
        ValueError: a dict model without `name`.
    """
    try:
        structure = model.output
    except (AttributeError, ValueError):
        structure = model.outputs[0]
    return tuple(select_output(structure, name).shape)

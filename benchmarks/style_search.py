"""Paper 003's style database at archive scale: bytes, memory, exact vs fast latency, agreement.

    python benchmarks/style_search.py                                    # 10,000 items (~5 min)
    python benchmarks/style_search.py --num_items=2000 --num_queries=10  # a quick look
    python benchmarks/style_search.py --results_md=benchmarks/RESULTS.md  # append the table

Builds a synthetic `tfmir.index.StyleDatabase` of --num_items items with the Gram sizes of
EfficientNet-Lite0's 7 block groups (channels 16, 24, 40, 80, 112, 192, 320: P = 80,712 packed
values, float16) and 1024-d vectors, saves it, loads it back (packed Grams memory-mapped) and
asks --num_queries new queries (not in the database) with each of the nine measures.

Synthetic data that looks like real Grams: every item belongs to one of --num_styles styles;
its feature map at layer l is relu(Z W_l) over --positions positions (25: few, to keep
the default run short; real block outputs have 49 to thousands), Z standard normal of
--rank columns (low rank, as real feature maps are), W_l = base_l + the style's offset + the
item's own noise; the Gram is F^T F / positions (as `tfmir.layers.GramMatrix`). The vector is
the style's centre plus noise through SELU; the mask a random ellipse on the 64 x 64 grid (one
in ten empty).

Reported: bytes per image (and of each array), the process's peak and loaded resident memory,
build / save / load times, the median latency of one query in exact mode (--exact_queries
queries, "style") and in fast mode (every query, every measure), and fast mode's agreement with
exact mode per measure: top-5 overlap (|fast top-5 ∩ exact top-5| / 5, i.e. recall@5) and how
often the top-5 is identical in order; plus how much of the style loss the PCA keeps, how
often LS_max was certified exact, and how many items were re-ranked. Ground truth: for each
query the exact style losses to every item (`style_losses_packed` on the stored rows) and the
similarity module's components, combined as `similarity_scores` does; checked against
`StyleDatabase.search(mode="exact")` on the first --exact_queries queries.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfmir.index import StyleDatabase  # noqa: E402
from tfmir.similarity import (COMPONENTS, MEASURES, dice_coefficient, euclidean_score,  # noqa: E402
                              harmonic_mean, pack_grams, rescaled_cosine, style_losses_packed)

LITE0_CHANNELS = (16, 24, 40, 80, 112, 192, 320)

_NUM_ITEMS = flags.DEFINE_integer("num_items", 10_000, "Items in the database.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 20, "Queries (not in the database).")
_EXACT_QUERIES = flags.DEFINE_integer("exact_queries", 3, "Queries timed in exact mode and "
                                      "checked against the ground truth.")
_NUM_STYLES = flags.DEFINE_integer("num_styles", 500, "Styles the items are drawn from.")
_ITEM_NOISE = flags.DEFINE_float("item_noise", 0.5, "Each item's own deviation from its style "
                                 "(the style offsets have scale 0.7).")
_POSITIONS = flags.DEFINE_integer("positions", 25, "Feature map positions H x W (5 x 5).")
_RANK = flags.DEFINE_integer("rank", 8, "Rank of the synthetic feature maps.")
_DIMENSION = flags.DEFINE_integer("dimension", 1024, "Feature vector length.")
_MASK_SIZE = flags.DEFINE_integer("mask_size", 64, "Mask grid side.")
_PROJECTION_DIM = flags.DEFINE_integer("projection_dim", 256, "PCA dimensions.")
_CANDIDATES = flags.DEFINE_list("candidates", ["100", "10"], "Fast mode: items per candidate "
                                "list; one fast run per value.")
_K = flags.DEFINE_integer("k", 5, "Results per query (the paper's k).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_DIRECTORY = flags.DEFINE_string("directory", None, "Where to save the database (default: a "
                                 "temporary folder, deleted afterwards).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write every figure here.")
_RESULTS_MD = flags.DEFINE_string("results_md", None, "Append the Markdown section to this file "
                                  "(e.g. benchmarks/RESULTS.md).")


class Generator:
    """Items of `num_styles` styles: vectors, Grams of low-rank feature maps, ellipse masks."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.bases = [rng.normal(size=(_RANK.value, c)).astype(np.float32) / np.sqrt(_RANK.value)
                      for c in LITE0_CHANNELS]
        self.offsets = [0.7 * rng.normal(size=(_NUM_STYLES.value, _RANK.value, c)).astype(
            np.float32) / np.sqrt(_RANK.value) for c in LITE0_CHANNELS]
        self.centres = rng.normal(size=(_NUM_STYLES.value, _DIMENSION.value)).astype(np.float32)

    def items(self, count):
        import tensorflow as tf

        rng = self.rng
        styles = rng.integers(0, _NUM_STYLES.value, count)
        vectors = self.centres[styles] + _ITEM_NOISE.value * 3 * rng.normal(
            size=(count, _DIMENSION.value)).astype(np.float32)
        vectors = np.where(vectors > 0, vectors, 1.6733 * (np.exp(np.minimum(vectors, 0)) - 1))
        grams = []
        for base, offsets in zip(self.bases, self.offsets):
            weights = base + offsets[styles] + _ITEM_NOISE.value * rng.normal(
                size=offsets[styles].shape).astype(np.float32) / np.sqrt(_RANK.value)
            latent = rng.normal(size=(count, _POSITIONS.value, _RANK.value)).astype(np.float32)
            features = np.maximum(latent @ weights, 0)
            # TensorFlow's batched matmul uses both cores; NumPy's is ~5x slower here.
            grams.append(tf.linalg.matmul(features, features, transpose_a=True).numpy()
                         / _POSITIONS.value)
        side = _MASK_SIZE.value
        rows, columns = np.mgrid[:side, :side]
        centre = rng.uniform(0.3, 0.7, (count, 2, 1, 1)) * side
        axes = rng.uniform(0.05, 0.35, (count, 2, 1, 1)) * side
        masks = ((rows - centre[:, 0]) / axes[:, 0]) ** 2 + \
            ((columns - centre[:, 1]) / axes[:, 1]) ** 2 < 1
        masks[rng.random(count) < 0.1] = False
        return vectors.astype(np.float32), grams, masks


def ground_truth(database, query, losses, measure):
    """Exact scores of every item, from the similarity module's components."""
    components = {}
    for name in COMPONENTS[measure]:
        if name == "euclidean":
            components[name] = euclidean_score(query["vector"], database.vectors)
        elif name == "cosine":
            components[name] = rescaled_cosine(query["vector"], database.vectors)
        elif name == "style":
            components[name] = 1.0 - losses / losses.max()
        else:
            components[name] = dice_coefficient(query["mask"], database.masks)
    return harmonic_mean(*components.values())


def main(argv):
    del argv
    started = time.perf_counter()
    directory = _DIRECTORY.value or tempfile.mkdtemp(prefix="style-benchmark-")
    generator = Generator(_SEED.value)
    count = _NUM_ITEMS.value
    size = sum(c * (c + 1) // 2 for c in LITE0_CHANNELS)
    watch = time.perf_counter()
    vectors = np.empty((count, _DIMENSION.value), np.float32)
    packed = np.empty((count, size), np.float16)
    masks = np.empty((count, _MASK_SIZE.value, _MASK_SIZE.value), bool)
    for start in range(0, count, 500):
        stop = min(start + 500, count)
        vectors[start:stop], grams, masks[start:stop] = generator.items(stop - start)
        packed[start:stop] = pack_grams(grams, dtype="float16")
    generate_seconds = time.perf_counter() - watch
    queries_vectors, queries_grams, queries_masks = generator.items(_NUM_QUERIES.value)
    queries = [{"vector": queries_vectors[row], "grams": [g[row] for g in queries_grams],
                "mask": queries_masks[row]} for row in range(_NUM_QUERIES.value)]

    watch = time.perf_counter()
    database = StyleDatabase(channels=LITE0_CHANNELS, mask_size=_MASK_SIZE.value,
                             model_fingerprint="synthetic", segmenter_fingerprint="synthetic",
                             projection_dim=_PROJECTION_DIM.value)
    database.build(vectors, packed_grams=packed, masks=masks, ids=list(range(count)))
    build_seconds = time.perf_counter() - watch
    del vectors, masks
    watch = time.perf_counter()
    path = database.save(os.path.join(directory, "ris"), overwrite=True)
    save_seconds = time.perf_counter() - watch
    peak_build_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del database, packed
    watch = time.perf_counter()
    database = StyleDatabase.load(path)
    load_seconds = time.perf_counter() - watch
    watch = time.perf_counter()
    StyleDatabase.load(path, verify=False)
    load_unverified_seconds = time.perf_counter() - watch
    # In memory once loaded: every array but the memory-mapped packed Grams, and the masks
    # unpacked (on first use) for the Dice coefficient.
    loaded_mb = (sum(array.nbytes for name, array in database._arrays().items()
                     if name != "packed_grams.npy") + database.masks.nbytes) / 2**20
    mapped_mb = database.packed_grams.nbytes / 2**20
    bytes_per_image = database.bytes_per_image()
    print(f"built {count} items in {build_seconds:.1f} s (generated in {generate_seconds:.1f} s), "
          f"saved in {save_seconds:.1f} s, loaded in {load_seconds:.1f} s; "
          f"{bytes_per_image['total']} bytes per image", flush=True)

    # Ground truth: the exact losses of every query in one pass over the stored rows, as
    # ‖y‖² − 2 y·q + ‖q‖² in float64 (one matrix product per block; new queries are far from
    # every item, so the cancellation this form suffers for near-duplicates does not arise).
    packed_queries = np.stack([pack_grams([g[None] for g in query["grams"]], dtype="float64")[0]
                               for query in queries])
    losses = np.empty((len(queries), count))
    for start in range(0, count, 1024):
        block = database.packed_grams[start:start + 1024].astype(np.float64)
        losses[:, start:start + 1024] = ((block ** 2).sum(axis=1) - 2 * packed_queries @ block.T
                                         + (packed_queries ** 2).sum(axis=1)[:, None])
    for q, loss in zip(packed_queries[:2], losses):  # against the similarity module's own
        np.testing.assert_allclose(loss, style_losses_packed(q, database.packed_grams),
                                   rtol=1e-9)
    style_max_errors = []

    exact_seconds, checked = [], 0
    for query, loss in zip(queries[:_EXACT_QUERIES.value], losses):
        watch = time.perf_counter()
        results = database.search(query, _K.value, "style")
        exact_seconds.append(time.perf_counter() - watch)
        for measure in MEASURES:
            scores = ground_truth(database, query, loss, measure)
            answer = (results if measure == "style"
                      else database.search(query, _K.value, measure))
            order = np.argsort(-scores, kind="stable")[:_K.value]
            assert [row["id"] for row in answer] == order.tolist(), measure
            np.testing.assert_allclose([row["score"] for row in answer], scores[order],
                                       atol=1e-7)
            checked += 1
    print(f"exact mode: {statistics.median(exact_seconds) * 1000:.0f} ms per query; "
          f"{checked} answers equal the ground truth", flush=True)

    # How much of the style loss the projection keeps, per (query, item) pair.
    kept_fractions, estimate_errors = [], []
    for q, loss in zip(packed_queries, losses):
        projected = database._project_query(q)
        kept = ((database.projected_grams.astype(np.float64) - projected[:-1]) ** 2).sum(axis=1)
        estimate = kept + projected[-1] ** 2 + database.gram_residuals.astype(np.float64) ** 2
        kept_fractions.append(np.median(kept / loss))
        estimate_errors.append(np.median(np.abs(estimate - loss) / loss))

    rows = []
    expected = {measure: [np.argsort(-ground_truth(database, query, loss, measure),
                                     kind="stable")[:_K.value].tolist()
                          for query, loss in zip(queries, losses)] for measure in MEASURES}
    for value in _CANDIDATES.value:
        for measure in MEASURES:
            overlaps, identical, fast_seconds, exact_max, candidates = [], 0, [], 0, []
            for query, loss, wanted in zip(queries, losses, expected[measure]):
                watch = time.perf_counter()
                answer, info = database.search(query, _K.value, measure, mode="fast",
                                               candidates=int(value), details=True)
                fast_seconds.append(time.perf_counter() - watch)
                got = [row["id"] for row in answer]
                overlaps.append(len(set(got) & set(wanted)) / _K.value)
                identical += got == wanted
                exact_max += info["style_max"] in ("exact", None)
                candidates.append(info["candidates"])
                if "style_max_value" in info:
                    style_max_errors.append(abs(info["style_max_value"] / loss.max() - 1))
            rows.append({"measure": measure, "candidates_per_list": int(value),
                         "fast_ms": statistics.median(fast_seconds) * 1000,
                         "recall_at_k": float(np.mean(overlaps)), "min_recall": min(overlaps),
                         "identical": identical / len(queries),
                         "style_max_exact": exact_max / len(queries),
                         "candidates": statistics.median(candidates)})
            print(f"{measure}, {value} candidates: fast {rows[-1]['fast_ms']:.0f} ms, "
                  f"recall@{_K.value} {rows[-1]['recall_at_k']:.3f}", flush=True)

    results = {
        "environment": {"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)),
                        "python": platform.python_version(), "numpy": np.__version__},
        "settings": {name: flags.FLAGS[name].value for name in (
            "num_items", "num_queries", "exact_queries", "num_styles", "positions", "rank",
            "dimension", "mask_size", "projection_dim", "candidates", "k", "seed", "item_noise")},
        "packed_size": size, "bytes_per_image": bytes_per_image,
        "fixed_bytes": database.describe()["fixed_bytes"],
        "generate_seconds": generate_seconds, "build_seconds": build_seconds,
        "save_seconds": save_seconds, "load_seconds": load_seconds,
        "load_unverified_seconds": load_unverified_seconds,
        "peak_resident_mb": peak_build_mb, "loaded_resident_mb": loaded_mb,
        "mapped_mb": mapped_mb,
        "exact_ms": statistics.median(exact_seconds) * 1000, "exact_checked": checked,
        "pca_kept_median": float(np.median(kept_fractions)),
        "style_max_error_max": float(max(style_max_errors, default=0.0)),
        "style_max_error_median": float(np.median(style_max_errors or [0.0])),
        "estimate_error_median": float(np.median(estimate_errors)),
        "rows": rows, "seconds": time.perf_counter() - started,
        # The machine may be shared: the load while this ran, next to its 2 cores.
        "load_average": os.getloadavg(),
    }
    table = markdown(results)
    print(table)
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as stream:
            json.dump(results, stream, indent=2)
    if _RESULTS_MD.value:
        with open(_RESULTS_MD.value, "a") as stream:
            stream.write("\n" + table)
    if _DIRECTORY.value is None:
        shutil.rmtree(directory, ignore_errors=True)


def markdown(results) -> str:
    settings = results["settings"]
    sizes = results["bytes_per_image"]
    lines = [
        f"| measure | candidates per list | fast, median ms | exact, median ms | "
        f"recall@{settings['k']} (min) | identical top-{settings['k']} | LS_max certified | "
        "re-ranked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        styled = "style" in COMPONENTS[row["measure"]]
        lines.append(
            f"| {row['measure']} | {row['candidates_per_list']} | {row['fast_ms']:.0f} | "
            f"{results['exact_ms']:.0f}{'' if row['measure'] == 'style' else ' ¹'} | "
            f"{row['recall_at_k']:.3f} ({row['min_recall']:.1f}) | {row['identical']:.0%} | "
            f"{row['style_max_exact']:.0%}{'' if styled else ' ²'} | {row['candidates']:.0f} |")
    header = [
        f"Run of {time.strftime('%Y-%m-%d')} ({results['seconds']:.0f} s) on "
        f"{results['environment']['cores']}-core {results['environment']['cpu']}: "
        f"{settings['num_items']:,} items with EfficientNet-Lite0's Gram sizes (P = "
        f"{results['packed_size']:,} packed float16 values), {settings['dimension']}-d vectors, "
        f"{settings['mask_size']}×{settings['mask_size']} masks; {settings['num_queries']} new "
        f"queries; PCA {settings['projection_dim']} dims; load average at the end "
        f"{results['load_average'][0]:.1f} (1 min) / {results['load_average'][2]:.1f} (15 min).",
        "",
        f"- Bytes per image: **{sizes['total']:,}** = vector {sizes['vector']:,} + packed Grams "
        f"{sizes['packed_grams']:,} + mask {sizes['mask']:,} + projection "
        f"{sizes['projection']:,}; plus {results['fixed_bytes'] / 2**20:.0f} MB once (the PCA "
        "basis and mean).",
        f"- Memory: peak resident {results['peak_resident_mb']:,.0f} MB while generating and "
        f"building (all packed rows in memory); loaded, the database keeps "
        f"{results['loaded_resident_mb']:,.0f} MB in memory (vectors, projection, masks "
        f"unpacked) and memory-maps the {results['mapped_mb']:,.0f} MB of packed Grams (read "
        "in full by each exact query, by the candidate rows in fast mode).",
        f"- Build (PCA fit on 2048 rows, projection of all) {results['build_seconds']:.0f} s, "
        f"save {results['save_seconds']:.0f} s, load {results['load_seconds']:.1f} s with sha256 "
        f"verification ({results['load_unverified_seconds']:.2f} s without).",
        f"- PCA: the projected squared distance keeps a median {results['pca_kept_median']:.1%} "
        f"of the style loss; the estimate with residual norms is off by a median "
        f"{results['estimate_error_median']:.1%}.",
        f"- LS_max in fast mode: off by a median {results['style_max_error_median']:.2%} "
        f"(at most {results['style_max_error_max']:.2%}) of the exact maximum.",
        f"- Exact mode equals the ground truth on all {results['exact_checked']} checked answers.",
        "",
    ]
    footer = [
        "",
        "¹ exact-mode latency measured for `style`; the other measures read the same arrays "
        "(without style: only vectors and masks, far less). ² no style component: fast mode is "
        "exact mode (vectors and masks are cheap).",
        "",
    ]
    return "\n".join(["## Style database search (`style_search.py`)", "", *header, *lines,
                      *footer])


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    app.run(main)

"""FAISS index types by name, their training on a sample, memory-mapped loading and the GPU path.

A wiki-18 flat index (21M x 768 float32) is ~64 GB: the out-of-memory complaint of Search-R1 users.
The types here trade exactness for memory (all inner product over unit vectors):

=============  ====================================  ==========================================
name           FAISS index                           bytes per vector (d = dim), trained?
=============  ====================================  ==========================================
``flat``       IndexFlatIP (exact, the paper's)      4d
``flat-fp16``  IndexScalarQuantizer fp16             2d (scores within ~1e-3 of flat)
``hnsw``       IndexHNSWFlat (M neighbours)          4d + 8M graph
``hnsw-sq8``   IndexHNSWSQ 8-bit                     d + 8M graph, trained (ranges)
``ivf-flat``   IndexIVFFlat (nlist lists)            4d + 8 (id), trained (k-means)
``ivf-sq8``    IndexIVFScalarQuantizer 8-bit         d + 8, trained
``ivf-sq4``    IndexIVFScalarQuantizer 4-bit         d/2 + 8, trained
``ivf-pq``     IndexIVFPQ (m sub-vectors x 8 bits)   m + 8, trained (k-means + PQ codebooks)
=============  ====================================  ==========================================

Any other string is passed to ``faiss.index_factory`` as is (e.g. ``"OPQ64,IVF4096,PQ64"``).

Re-ranking (``rerank=True``): the build also keeps the vectors in fp16 in ``rerank.f16.npy`` (2d bytes
a vector, on disk, memory-mapped, never loaded whole); a search fetches ``candidates`` rows from the
compressed index and re-scores them exactly against those vectors (:func:`rerank`). RAM stays at
the compressed codes; each query reads ``candidates`` x 2d bytes from the file (pages the OS may
cache). On 384-d MiniLM vectors no in-RAM type at <= 1/8 of flat's memory reaches 0.95 recall@10
against flat (IVF-PQ48 0.72, IVF-SQ4 0.93 at 1/7); IVF-PQ48 + re-ranking 100 candidates does.
Trained types learn from ``train_size`` vectors drawn uniformly (seeded) from the corpus, not the
first ones (wiki-18 is sorted by title). Search-time knobs: ``nprobe`` (IVF lists visited) and
``ef_search`` (HNSW candidate list). ``read_faiss(..., mmap=True)`` maps the vector codes from the
file instead of reading them into RAM (pages load on demand; the OS may drop them again).
``to_gpu`` clones an index onto all visible GPUs, sharded and in fp16, as Search-R1's
``--faiss_gpu`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stepsearch.errors import RetrievalError

FAISS_TYPES = ("flat", "flat-fp16", "hnsw", "hnsw-sq8", "ivf-flat", "ivf-sq8", "ivf-sq4", "ivf-pq")
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid


@dataclass(frozen=True)
class FaissSpec:
    """Which FAISS index to build and its parameters (``None`` = chosen from the corpus size/dim).

    Attributes:
        type: a name of :data:`FAISS_TYPES` or a ``faiss.index_factory`` string.
        nlist: IVF lists (default ~4·sqrt(n), at most n/39 so k-means has enough points).
        pq_m: PQ sub-vectors (default d/4: 4 dimensions per byte); must divide d.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build-time candidate list.
        train_size: vectors to train on (default min(n, max(100k, 64·nlist))).
        seed: training sample and k-means seed.
        rerank: also keep fp16 vectors on disk for exact re-ranking of candidates.
    """

    type: str = "flat"
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 200
    train_size: int | None = None
    seed: int = 0
    rerank: bool = False

    def check(self) -> None:
        # index_factory strings start with a capital ("IVF...", "HNSW...", "OPQ...", "PCA...", "Flat")
        if self.type not in FAISS_TYPES and not self.type[:1].isupper():
            raise RetrievalError(
                f"unknown FAISS index type {self.type!r}: use one of {', '.join(FAISS_TYPES)} "
                "or a faiss.index_factory string such as 'IVF1024,PQ64'"
            )
        for name in ("nlist", "pq_m", "train_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise RetrievalError(f"FAISS {name} must be a positive integer, got {value!r}")
        if self.hnsw_m <= 0 or self.ef_construction <= 0:
            raise RetrievalError(f"hnsw_m and ef_construction must be positive, got {self.hnsw_m}, {self.ef_construction}")

    def params(self) -> dict:
        """The parameters that matter for this type, for index metadata and reports."""
        relevant = {"nlist", "train_size", "seed"} if "ivf" in self.type.lower() else set()
        relevant |= {"pq_m"} if "pq" in self.type.lower() else set()
        relevant |= {"hnsw_m", "ef_construction"} if "hnsw" in self.type.lower() else set()
        relevant |= {"rerank"} if self.rerank else set()
        return {k: v for k, v in self.__dict__.items() if k in relevant and v is not None}


def default_nlist(count: int) -> int:
    """~4·sqrt(n) lists, at most n/39 (k-means needs points), at least 1."""
    return max(1, min(int(4 * math.sqrt(max(count, 1))), count // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """d/4 sub-vectors (4 dims per 8-bit code), lowered to a divisor of d."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return m


def factory_string(spec: FaissSpec, dim: int, count: int) -> str:
    """The ``faiss.index_factory`` description of ``spec`` for ``count`` vectors of ``dim``."""
    nlist = spec.nlist or default_nlist(count)
    names = {
        "flat": "Flat",
        "flat-fp16": "SQfp16",
        "hnsw": f"HNSW{spec.hnsw_m},Flat",
        "hnsw-sq8": f"HNSW{spec.hnsw_m},SQ8",
        "ivf-flat": f"IVF{nlist},Flat",
        "ivf-sq8": f"IVF{nlist},SQ8",
        "ivf-sq4": f"IVF{nlist},SQ4",
        "ivf-pq": f"IVF{nlist},PQ{spec.pq_m or default_pq_m(dim)}",
    }
    if spec.type == "ivf-pq" and dim % (spec.pq_m or default_pq_m(dim)):
        raise RetrievalError(f"pq_m={spec.pq_m} must divide the vector dimension {dim}")
    return names.get(spec.type, spec.type)


def new_index(spec: FaissSpec, dim: int, count: int):
    """An empty (untrained where the type needs training) inner-product index."""
    import faiss

    spec.check()
    description = factory_string(spec, dim, count)
    try:
        index = faiss.index_factory(int(dim), description, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise RetrievalError(f"FAISS cannot make {description!r}: {str(err).strip().splitlines()[-1][:200]}") from None
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.efConstruction = int(spec.ef_construction)
    ivf = _ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # Polysemous codes (a Hamming pre-filter we never enable) take ~50x the PQ training time.
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def train_sample_rows(spec: FaissSpec, count: int, nlist: int | None = None) -> np.ndarray:
    """Sorted row numbers of the training sample: uniform without replacement, seeded."""
    size = spec.train_size or max(100_000, 64 * (nlist or spec.nlist or default_nlist(count)))
    size = min(size, count)
    if size == count:
        return np.arange(count)
    return np.sort(np.random.default_rng(spec.seed).choice(count, size=size, replace=False))


def train(index, sample: np.ndarray, seed: int = 0) -> None:
    """Train ``index`` on ``sample`` (float32, unit rows) if it needs it."""
    if index.is_trained:
        return
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
        if len(sample) < ivf.nlist:
            raise RetrievalError(f"{len(sample)} training vectors cannot make {ivf.nlist} IVF lists; lower nlist")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def set_search_params(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Apply search-time knobs where the index has them (IVF ``nprobe``, HNSW ``efSearch``)."""
    ivf = _ivf(index)
    if ivf is not None and nprobe:
        ivf.nprobe = min(int(nprobe), ivf.nlist)
    hnsw = _hnsw(index)
    if hnsw is not None and ef_search:
        hnsw.efSearch = int(ef_search)


def describe_index(index) -> dict:
    """Type and shape facts for metadata and ``/health``."""
    facts = {"faiss_class": type(index).__name__, "ntotal": int(index.ntotal), "dim": int(index.d)}
    ivf = _ivf(index)
    if ivf is not None:
        facts.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    hnsw = _hnsw(index)
    if hnsw is not None:
        facts.update(ef_search=int(hnsw.efSearch))
    return facts


def write_faiss(index, path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_faiss(path, mmap: bool = False):
    """Read an index file; with ``mmap`` the codes stay in the file (mapped, read-only)."""
    import faiss

    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()
        reason = next((line for line in reversed(reason) if line.strip()), "unreadable")[:200]
        raise RetrievalError(f"cannot read FAISS index {path}: {reason}") from None


def to_gpu(index, shard: bool = True, fp16: bool = True):
    """Clone ``index`` onto all visible GPUs (sharded, fp16 storage), as Search-R1's ``--faiss_gpu``."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        raise RetrievalError(
            "faiss_gpu is set but this FAISS build sees no GPU (faiss-cpu installed, or no CUDA device): "
            "install faiss-gpu on a CUDA machine or drop the GPU option"
        )
    options = faiss.GpuMultipleClonerOptions()
    options.shard, options.useFloat16 = bool(shard), bool(fp16)
    return faiss.index_cpu_to_all_gpus(index, co=options)


RERANK_FILE = "rerank.f16.npy"
RERANK_CHUNK = 65536


def write_rerank_vectors(vectors: np.ndarray, path) -> None:
    """Store ``vectors`` as an ``(n, d)`` float16 ``.npy`` (chunk by chunk: they may be a memmap)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, len(vectors), RERANK_CHUNK):
        out[start : start + RERANK_CHUNK] = vectors[start : start + RERANK_CHUNK]
    out.flush()
    del out


def rerank(queries: np.ndarray, candidates: np.ndarray, stored: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of candidate rows: ``(scores, rows)``, each ``(n, k)``, best first, ``-1`` padded.

    ``queries`` ``(n, d)`` float32; ``candidates`` ``(n, c)`` rows from a compressed index (``-1`` =
    none); ``stored`` ``(N, d)`` vectors (fp16 memmap). Scores are float32 inner products.
    """
    n = len(queries)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        valid = np.unique(candidates[i][candidates[i] >= 0])  # sorted rows: sequential reads of the file
        if not len(valid):
            continue
        exact = np.asarray(stored[valid], dtype=np.float32) @ queries[i]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[i, : len(top)], rows[i, : len(top)] = exact[top], valid[top]
    return scores, rows


def index_bytes(index) -> int:
    """Bytes of the serialized index: its memory when loaded without mmap (to within a few KB)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def _hnsw(index):
    import faiss

    downcast = faiss.downcast_index(index)
    return getattr(downcast, "hnsw", None)

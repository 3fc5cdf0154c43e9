"""Fast top-k for large codebooks at inference: FAISS indexes per codebook group.

Exact top-k scores every code for every token; with about 25,000 codes or more per group
on a CPU, choosing the k best of those scores, not the product, is most of the time.
An index answers the same question without looking at every code: ``"flat"`` is exact
(FAISS's blocked product + heap), ``"hnsw"`` and ``"ivf"`` are approximate (graph and
inverted-list search; recall against exact top-k is measured by
``benchmarks/code_index.py``).

An index is used by `CodebookLayer.top_k` only under ``torch.no_grad`` (inference, code
search, caching activations); training always scores every code. It is rebuilt when the
codes or the disabled mask change (keyed on their in-place version counters, so
optimiser steps, ``copy_`` and ``load_state_dict`` all count; after writing to
``codes.data`` directly call `CodeIndex.reset`). CPU only: on an accelerator the
exact batched product is the faster search.

Needs the ``faiss`` extra: ``pip install 'codelens[faiss]'``.

    from codelens.code_index import use_code_index
    use_code_index(model, "hnsw")   # every codebook of the model
    use_code_index(model, None)     # back to exact top-k
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

if TYPE_CHECKING:
    from codelens.codebook import CodebookLayer

Kind = Literal["flat", "hnsw", "ivf"]
KINDS = ("flat", "hnsw", "ivf")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the code index needs FAISS, which is an optional extra: "
            "pip install 'codelens[faiss]' (or pip install faiss-cpu)"
        ) from error
    return faiss


class CodeIndex:
    """Per-group FAISS indexes over one `CodebookLayer`'s enabled codes.

    Args:
        kind: ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate).
        hnsw_m: graph degree of HNSW (more: better recall, bigger, slower to build).
        ef_construction: HNSW candidate-list size when building.
        ef_search: HNSW candidate-list size when searching.
        nlist: IVF lists; ``None`` picks about ``4 * sqrt(n_codes)``.
        nprobe: IVF lists searched per query.

    ``ef_search`` and ``nprobe`` may be changed between searches without a rebuild.

    Similarities map onto FAISS metrics exactly: cosine is nearest neighbour among
    unit-length codes, dot product becomes nearest neighbour after appending
    ``sqrt(max|c|^2 - |c|^2)`` to each code (and 0 to each query), euclidean is itself.
    """

    def __init__(
        self,
        kind: Kind = "hnsw",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        self._faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("nprobe", nprobe),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        self.kind: Kind = kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe = nlist, nprobe
        self.builds = 0
        self.reset()

    def __repr__(self) -> str:
        return f"CodeIndex(kind={self.kind!r}, builds={self.builds})"

    def reset(self) -> None:
        """Forget the built indexes; the next search rebuilds them."""
        self._key: tuple | None = None
        self._indexes: list[Any] = []
        self._code_ids: list[Tensor] = []

    def search(self, layer: CodebookLayer, queries: Float[Tensor, "G N d"]) -> Int[Tensor, "G N k"]:
        """The (approximately, unless ``"flat"``) best k enabled codes per query and group.

        ``queries`` are what the layer scores (after its LayerNorm, if any).
        """
        if queries.device.type != "cpu" or layer.codes.device.type != "cpu":
            raise ValueError(
                "CodeIndex runs on CPU only; on an accelerator exact top-k is faster: "
                "detach it with use_code_index(model, None)"
            )
        self.build(layer)
        self._faiss.omp_set_num_threads(torch.get_num_threads())
        ids = torch.empty(*queries.shape[:2], layer.k, dtype=torch.long)
        # One FAISS index per group (FAISS has no batched multi-index search); each
        # call searches every token of its group, so the loop runs G times per forward.
        for group, (index, code_ids) in enumerate(zip(self._indexes, self._code_ids, strict=True)):
            found = self._search_group(layer, index, queries[group])
            missing = (found < 0).any(-1)
            if missing.any():  # an approximate search can come back short: score those exactly
                found[missing] = _exact_rows(layer, group, queries[group][missing], code_ids)
            ids[group] = code_ids[found]
        return ids

    def build(self, layer: CodebookLayer) -> None:
        """Build the indexes for ``layer``'s current codes, unless they are up to date."""
        key = (
            id(layer),
            layer.codes._version,
            layer.codes.data_ptr(),
            layer.disabled._version,
            layer.disabled.data_ptr(),
            layer.similarity,
            tuple(layer.codes.shape),
        )
        if key == self._key:
            return
        self.reset()
        codes = layer.codes.detach().float()
        for group in range(layer.n_groups):
            code_ids = (~layer.disabled[group]).nonzero().squeeze(1)
            self._code_ids.append(code_ids)
            self._indexes.append(self._build_group(layer, codes[group, code_ids]))
        self._key = key
        self.builds += 1

    # ------------------------------------------------------------------ internals

    def _build_group(self, layer: CodebookLayer, vectors: Tensor) -> Any:
        faiss = self._faiss
        if layer.similarity == "cosine":
            vectors = F.normalize(vectors, dim=-1)
        if self.kind == "flat":  # exact: inner product as such, no transform
            index = (
                faiss.IndexFlatL2(layer.d)
                if layer.similarity == "euclidean"
                else faiss.IndexFlatIP(layer.d)
            )
        else:
            if layer.similarity == "dot":
                vectors = _augment_codes(vectors)
            dim = vectors.shape[1]
            if self.kind == "hnsw":
                index = faiss.IndexHNSWFlat(dim, self.hnsw_m)
                index.hnsw.efConstruction = self.ef_construction
            else:
                n = vectors.shape[0]
                nlist = self.nlist or int(4 * n**0.5)
                nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 points per list
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
                index.train(_numpy(vectors))
        index.add(_numpy(vectors))
        return index

    def _search_group(
        self, layer: CodebookLayer, index: Any, queries: Float[Tensor, "N d"]
    ) -> Int[Tensor, "N k"]:
        if self.kind == "hnsw":
            index.hnsw.efSearch = self.ef_search
        elif self.kind == "ivf":
            index.nprobe = min(self.nprobe, index.nlist)
        if self.kind != "flat" and layer.similarity == "dot":
            queries = F.pad(queries, (0, 1))
        _, found = index.search(_numpy(queries), layer.k)
        return torch.from_numpy(found)


def _augment_codes(vectors: Float[Tensor, "C d"]) -> Float[Tensor, "C d+1"]:
    """Maximum inner product as nearest neighbour: |q' - c'|^2 = |q|^2 + M^2 - 2 q.c."""
    squares = vectors.pow(2).sum(-1)
    extra = (squares.max() - squares).clamp(min=0).sqrt()
    return torch.cat([vectors, extra[:, None]], dim=1)


def _exact_rows(
    layer: CodebookLayer, group: int, queries: Float[Tensor, "n d"], code_ids: Int[Tensor, " c"]
) -> Int[Tensor, "n k"]:
    """Positions (into ``code_ids``) of the exact top-k codes of one group."""
    codes = layer.codes.detach()[group, code_ids].float()
    if layer.similarity == "cosine":
        scores = queries @ F.normalize(codes, dim=-1).T
    elif layer.similarity == "dot":
        scores = queries @ codes.T
    else:
        scores = 2 * queries @ codes.T - codes.pow(2).sum(-1)
    return scores.topk(layer.k, dim=-1).indices


def _numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().numpy())


def use_code_index(module: nn.Module, kind: Kind | None = "hnsw", **options: Any) -> int:
    """Give every `CodebookLayer` in ``module`` its own `CodeIndex` (``kind=None``: remove them).

    ``module`` is a `HookedCodebookTransformer`, a `CodebookLayer` or anything holding
    them; ``options`` go to `CodeIndex`. Returns the number of codebooks changed.
    """
    from codelens.codebook import CodebookLayer

    if kind is not None:
        CodeIndex(kind, **options)  # validate once, with a clear error, before changing anything
    layers = [m for m in module.modules() if isinstance(m, CodebookLayer)]
    for layer in layers:
        layer.code_index = None if kind is None else CodeIndex(kind, **options)
    return len(layers)

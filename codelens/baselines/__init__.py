"""Baselines for codes on the same tasks: sparse autoencoders, PCA, ICA and neurons.

All run natively on the TransformerLens 4 bridge through the model's own hooks (SAELens
needs TransformerLens < 4). Activations come from `cache_activations` (RAM) or
`store_activations` (memory-mapped shards on disk); every baseline is a `LinearFeatures`
dictionary, so the code that scores, steers and swaps codes scores,
steers and swaps these features too.
"""

from codelens.baselines.activations import (
    ActivationStore,
    cache_activations,
    iter_activations,
    site_width,
    store_activations,
)
from codelens.baselines.directions import ica_features, pca_features
from codelens.baselines.encoding import encode_all, encode_batch_size, identity_features
from codelens.baselines.features import (
    LinearFeatures,
    ProjectionFeatures,
    neurons,
    splice_hooks,
    steer_feature_hooks,
    swap_feature_hooks,
    zero_hooks,
)
from codelens.baselines.ica import ICAResult, amari_distance, fast_ica
from codelens.baselines.loss_score import ce_loss_score, lm_loss, splice_loss_cost, spliced
from codelens.baselines.sae import (
    SAEConfig,
    SparseAutoencoder,
    TrainStats,
    auxk_loss,
    sae_metrics,
    train_sae,
)
from codelens.baselines.saving import load_features
from codelens.baselines.sweep import L0Sweep, SweepPoint, sweep_l0

__all__ = [
    "ActivationStore",
    "ICAResult",
    "L0Sweep",
    "LinearFeatures",
    "ProjectionFeatures",
    "SAEConfig",
    "SparseAutoencoder",
    "SweepPoint",
    "TrainStats",
    "amari_distance",
    "auxk_loss",
    "cache_activations",
    "ce_loss_score",
    "encode_all",
    "encode_batch_size",
    "fast_ica",
    "ica_features",
    "identity_features",
    "iter_activations",
    "lm_loss",
    "load_features",
    "neurons",
    "pca_features",
    "sae_metrics",
    "site_width",
    "splice_hooks",
    "splice_loss_cost",
    "spliced",
    "steer_feature_hooks",
    "store_activations",
    "swap_feature_hooks",
    "sweep_l0",
    "train_sae",
    "zero_hooks",
]

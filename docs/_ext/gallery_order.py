"""Reading order of the example gallery (sphinx-gallery's ``within_subsection_order``)."""

from __future__ import annotations

#: The examples in the order the gallery shows them: the Quicktour first, then
#: decompositions, analysis, and adapters from one network to their exchange formats.
ORDER = (
    "quicktour.py",
    "decompose_real_tensor.py",
    "ranks_for_a_budget.py",
    "analyze_finetune.py",
    "flora_convnet.py",
    "two_adapters.py",
    "lora_export_import.py",
    "dask_out_of_core.py",
)


class ExampleOrder:
    """Sort key: an example's place in :data:`ORDER` (a script not listed is an error)."""

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> int:
        if filename not in ORDER:
            raise ValueError(f"examples/{filename} is not in ORDER of docs/_ext/gallery_order.py")
        return ORDER.index(filename)

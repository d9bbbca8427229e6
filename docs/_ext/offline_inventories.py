"""Write small intersphinx inventories for NumPy, PyTorch and Python at build time.

CI and users' machines build the docs without network access, so the
cross-references to NumPy, PyTorch and the standard library resolve against
these hand-listed inventories instead of the projects' downloaded
``objects.inv``. Add an entry here when the docs reference a new object.
"""

from __future__ import annotations

import zlib
from pathlib import Path

INVENTORIES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "numpy": (
        "https://numpy.org/doc/stable/",
        {
            "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html#$"),
            "numpy.linalg.svd": ("py:function", "reference/generated/numpy.linalg.svd.html#$"),
            "numpy.linalg.eigh": ("py:function", "reference/generated/numpy.linalg.eigh.html#$"),
            "numpy.tensordot": ("py:function", "reference/generated/numpy.tensordot.html#$"),
            "numpy.matmul": ("py:data", "reference/generated/numpy.matmul.html#$"),
            "numpy.moveaxis": ("py:function", "reference/generated/numpy.moveaxis.html#$"),
            "numpy.random.Generator": (
                "py:class",
                "reference/random/generator.html#$",
            ),
            "numpy.random.default_rng": (
                "py:function",
                "reference/random/generator.html#$",
            ),
        },
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        {
            "torch.Tensor": ("py:class", "tensors.html#$"),
            "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html#$"),
            "torch.nn.Linear": ("py:class", "generated/torch.nn.Linear.html#$"),
            "torch.nn.Conv1d": ("py:class", "generated/torch.nn.Conv1d.html#$"),
            "torch.nn.Conv2d": ("py:class", "generated/torch.nn.Conv2d.html#$"),
            "torch.nn.Conv3d": ("py:class", "generated/torch.nn.Conv3d.html#$"),
            "torch.nn.Embedding": ("py:class", "generated/torch.nn.Embedding.html#$"),
            # autodoc writes base classes under their defining module's name.
            "torch.nn.modules.module.Module": ("py:class", "generated/torch.nn.Module.html#$"),
            "torch.nn.modules.linear.Linear": ("py:class", "generated/torch.nn.Linear.html#$"),
            "torch.nn.modules.conv.Conv1d": ("py:class", "generated/torch.nn.Conv1d.html#$"),
            "torch.nn.modules.conv.Conv2d": ("py:class", "generated/torch.nn.Conv2d.html#$"),
            "torch.nn.modules.conv.Conv3d": ("py:class", "generated/torch.nn.Conv3d.html#$"),
            "torch.nn.modules.sparse.Embedding": (
                "py:class",
                "generated/torch.nn.Embedding.html#$",
            ),
            "torch.nn.Parameter": ("py:class", "generated/torch.nn.parameter.Parameter.html#$"),
            "torch.nn.utils.parametrize.register_parametrization": (
                "py:function",
                "generated/torch.nn.utils.parametrize.register_parametrization.html#$",
            ),
            "torch.nn.parallel.DistributedDataParallel": (
                "py:class",
                "generated/torch.nn.parallel.DistributedDataParallel.html#$",
            ),
            "torch.distributed.fsdp.fully_shard": (
                "py:function",
                "distributed.fsdp.fully_shard.html#$",
            ),
            "torch.utils.data.DistributedSampler": (
                "py:class",
                "data.html#torch.utils.data.distributed.DistributedSampler",
            ),
            "torch.compile": ("py:function", "generated/torch.compile.html#$"),
            "torch.load": ("py:function", "generated/torch.load.html#$"),
            "torch.func.functional_call": (
                "py:function",
                "generated/torch.func.functional_call.html#$",
            ),
            "torch.autograd.gradcheck": (
                "py:function",
                "generated/torch.autograd.gradcheck.gradcheck.html#$",
            ),
        },
    ),
    "python": (
        "https://docs.python.org/3/",
        {
            "dict": ("py:class", "library/stdtypes.html#$"),
            "tuple": ("py:class", "library/stdtypes.html#$"),
            "list": ("py:class", "library/stdtypes.html#$"),
            "float": ("py:class", "library/functions.html#$"),
            "int": ("py:class", "library/functions.html#$"),
            "str": ("py:class", "library/stdtypes.html#$"),
            "ValueError": ("py:exception", "library/exceptions.html#$"),
            "TypeError": ("py:exception", "library/exceptions.html#$"),
            "pathlib.Path": ("py:class", "library/pathlib.html#$"),
            "json": ("py:module", "library/json.html#module-$"),
            "re.fullmatch": ("py:function", "library/re.html#$"),
            "pickle": ("py:module", "library/pickle.html#module-$"),
            "argparse": ("py:module", "library/argparse.html#module-$"),
        },
    ),
}


def write_inventory(path: Path, project: str, entries: dict[str, tuple[str, str]]) -> None:
    """Write a version-2 Sphinx inventory holding ``entries``."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: stable\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, (role, uri) in sorted(entries.items()))
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


def intersphinx_mapping(directory: Path) -> dict[str, tuple[str, str]]:
    """Write every inventory under ``directory`` and return the intersphinx mapping."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (base_url, entries) in INVENTORIES.items():
        path = directory / f"{project}.inv"
        write_inventory(path, project, entries)
        mapping[project] = (base_url, str(path))
    return mapping

"""tunec: a declarative dataset-and-recipe compiler for instruction tuning and fine-tuning.

The distribution installs one package, ``tunec``:

- ``tunec.compiler`` (source folder ``compiler/``): recipe -> shards + plan; never imports torch
- ``tunec.runtime`` (``runtime/``): executes a plan with torch, transformers and peft
- ``tunec.templates`` (``templates/``): the template library, shipped as package data
- ``tunec.cli``: the ``tunec`` command, the composition root that wires the two together
"""

from tunec._dist import dist_version as _dist_version

__version__ = _dist_version("tunec")
if __version__ == "absent":  # running from a source tree without install
    __version__ = "0.0.0+source"

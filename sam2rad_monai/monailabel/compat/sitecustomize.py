"""Let MONAI Label 0.8.5 import under pydicom 3 (put on PYTHONPATH by ``python -m sam2rad_monai.monailabel``).

MONAI Label imports ``pydicom_seg``, which imports ``pydicom._storage_sopclass_uids``, a module pydicom 3 removed
(its UIDs now live in ``pydicom.uid``). highdicom needs pydicom 3, so instead of pinning pydicom 2 this serves that
one module name from ``pydicom.uid``, lazily and only when something asks for it. Being a ``sitecustomize``, it also
reaches the processes MONAI Label starts for training.
"""

import importlib.abc
import importlib.util
import sys

_NAME = "pydicom._storage_sopclass_uids"


class _UidAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == _NAME else None

    def create_module(self, spec):
        import pydicom.uid

        return pydicom.uid

    def exec_module(self, module):
        pass


if not any(isinstance(f, _UidAlias) for f in sys.meta_path):
    sys.meta_path.append(_UidAlias())  # appended: a pydicom that still has the module keeps its own

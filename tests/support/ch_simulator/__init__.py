"""A Cloud Hypervisor v53 API simulator for tests on machines without KVM. Never for production.

Run as ``python -m tests.support.ch_simulator`` or through the ``cloud-hypervisor`` wrapper in
this folder; see ``__main__.py``. It needs Cloud Hypervisor's API description, which lives outside
the repository (see ``spec.py``); tests that start it skip when it is absent.
"""

from pathlib import Path

WRAPPER = Path(__file__).resolve().with_name("cloud-hypervisor")
"""The stand-in ``cloud-hypervisor`` binary: set it as ``CLOUD_HYPERVISOR_BIN``."""

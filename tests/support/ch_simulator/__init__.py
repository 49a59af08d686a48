"""A Cloud Hypervisor v53 API simulator for tests on machines without KVM. Never for production.

Run as ``python -m tests.support.ch_simulator`` or through the ``cloud-hypervisor`` wrapper in
this folder; see ``__main__.py``.
"""

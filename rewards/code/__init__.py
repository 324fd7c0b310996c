"""The `code` reward and its sandbox.

reward.py (the compute_score entry and CodeConfig), tests_spec.py (ground truth), extract.py
(finding the program), compare.py (stdout comparison), sandbox.py (scorer side of the local
sandbox), jail/ (the privileged launcher, standard library only), harness/ (the scripts that
run inside the sandbox), http_backend.py (SandboxFusion-compatible service).
"""

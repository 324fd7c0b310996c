"""The sandbox jail: standard-library code that runs as the privileged launcher.

Executed as a directory (`python -I -S -B rewards/code/jail`, see __main__.py), never
imported by the scorer except in tests of its pure parts (seccomp program, wire format).
"""

"""Scripts copied into the sandbox: the program server, the test checker and their wire
format. They run under `python -I -S` inside the sandbox and are never imported here; this
file only makes the directory a package so installs ship it."""

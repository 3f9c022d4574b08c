"""The code that runs inside the REPL worker process.

`bootstrap.py` is executed as a script by the sandboxed interpreter, where nothing of
`rlm_async` is visible: it imports only the standard library. The engine side imports it
as a plain module for the protocol constants, so both ends share one definition.
"""

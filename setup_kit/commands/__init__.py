"""One module per verb: Typer parameters in, a call into the verb's library module out.

Modules here import only typer and the standard library at module level.
"""

"""The one exception type for mistakes a user can make."""


class LlamaError(ValueError):
    """A problem with the user's input: a config, a path, a checkpoint, a mesh or a flag.

    The message names what is wrong (the file, tensor, field or flag) and what to do.
    The command-line tool prints it without a traceback and exits non-zero.
    """

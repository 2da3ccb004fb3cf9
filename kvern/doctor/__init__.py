"""``kvern doctor``: one line per check of a set-up, and a non-zero exit on any failure.

Every check reuses the module kvern itself runs for that part, so the doctor
says what ``kvern serve`` will do rather than a guess of it:

- ``cli``: the arguments and the run, with ``kvern serve``'s own loader handed in;
- ``config_checks``: the configuration loads (each bad key path on its own line);
- ``local_checks``: the analytics db and its disk, the port, the admin key;
- ``upstream_checks``: each upstream reachable, its models, what it is, its cache model;
- ``tokenizer_checks``: the tokenizer hub, each model's tokenizer exact or why not;
- ``parity_checks``: kvern's rendering and tokens against each upstream's;
- ``usage_checks``: whether an upstream reports the cached tokens kvern checks against;
- ``diagnose``: their order; ``report``: the lines, the progress, the exit status.
"""

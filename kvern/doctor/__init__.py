"""``kvern doctor``: one line per check of a set-up, and a non-zero exit on any failure."""

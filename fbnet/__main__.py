"""``python -m fbnet ...`` is the ``fbnet`` command; ``torchrun --nproc_per_node N -m fbnet train ...``
trains with one process per GPU (or CPU share), see :mod:`fbnet.distributed`."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="fbnet")

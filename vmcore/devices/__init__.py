"""The devices of Ferry's ``virt``-compatible board, one module per device.

Each device is a plain object with ``read(offset, size)``/``write(offset, size, value)`` for
the bus and ``save()``/``restore()`` for VM state. Devices never import the hart: they drive
interrupt lines through callables the board hands them, so each can be tested alone.
"""

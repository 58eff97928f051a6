"""What a connection's socket holds that the event loop has not read yet."""

import fcntl
import struct
import termios


def pending_bytes(fileno: int) -> int:
    """Bytes received on the socket `fileno` and not read yet (FIONREAD); 0 when it cannot be
    asked (closed already). A connection whose peer has sent something is not silent, even
    before the loop has read it: under a flood, an accept loop takes a batch of connections
    before it reads from any of them."""
    if fileno < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0

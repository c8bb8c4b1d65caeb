# echo.pxi: a plain echo WebSocket on ECHO_PATH, through the same frame layer as WS_PATH.
# It exists so the frame layer can be checked against the Autobahn TestSuite (kosoku):
# fragments, UTF-8, RSV bits, close codes and the close handshake, ping/pong, size limits.

cdef class EchoSession(Connection):
    """Echoes every whole message with its own opcode. No auth, no channels."""

    def __init__(self, Hub hub, str peer, Py_ssize_t max_message):
        Connection.__init__(self, hub, peer, max_message)

    cdef void slow_reader_event(self, str reason) except *:
        self.hub.node.security_event(self, "slow_reader", reason)

    cdef void on_message(self, int opcode, bytes payload):
        if opcode == WSMsgType.TEXT:
            try:
                PyUnicode_DecodeUTF8(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                                     NULL)
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_DATA, "text message is not valid UTF-8")
                return
        cdef bytes frame
        if (self.deflate >= DEFLATE_MIN_BITS and self.hub.compression
                and PyBytes_GET_SIZE(payload) >= self.hub.compression_min_bytes):
            frame = deflate_frame(<uint8_t>opcode, PyBytes_AS_STRING(payload),
                                  PyBytes_GET_SIZE(payload), self.deflate)
        else:
            frame = frame_bytes(<uint8_t>opcode, PyBytes_AS_STRING(payload),
                                PyBytes_GET_SIZE(payload))
        self.enqueue_frame(frame)

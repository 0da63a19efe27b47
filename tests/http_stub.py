"""A stand-in HTTP server for what a real DICOMweb server cannot be made to
do on cue: answer with a Warning header, an empty STOW-RS answer, a 400, or
hold a request without answering.

Usage, in a test module::

    from http_stub import stub_server  # fixture

    def test_x(stub_server):
        stub_server["answer"] = lambda method, target: (200, {"Content-Type": "application/dicom+json"}, b"[]")
        ... requests to stub_server["url"] ...
        assert stub_server["requests"] == [("GET", "/dicom-web/studies?...")]

``answer`` may block (a server that holds a request); its threads are
daemons, so the test's end does not wait for them.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def stub_server():
    """An HTTP server answering as ``answer(method, path_and_query)`` says
    ((status, headers, body)); ``requests`` lists the request lines it got."""
    import http.server
    import threading

    state = {"answer": lambda method, target: (200, {"Content-Type": "application/dicom+json"}, b"[]"),
             "requests": []}

    class Stub(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            state["requests"].append((self.command, self.path))
            status, headers, body = state["answer"](self.command, self.path)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply  # noqa: N815 - http.server's names

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()

"""A real RTSP server (GStreamer's gst-rtsp-server, Debian packages) streaming one photo
as MJPEG at 10 fps on rtsp://127.0.0.1:PORT/cam. Run with the system Python that has
the GObject bindings: /usr/bin/python3 tests/rtsp_standin.py PORT PHOTO WIDTH HEIGHT

Debian: apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
gstreamer1.0-plugins-good gstreamer1.0-plugins-base python3-gi
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, photo, width, height = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
server = GstRtspServer.RTSPServer()
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f'( filesrc location="{photo}" ! jpegdec ! videoconvert ! videoscale '
    f"! video/x-raw,width={width},height={height} ! imagefreeze "
    "! video/x-raw,framerate=10/1 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
)
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()

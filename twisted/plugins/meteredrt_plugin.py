"""
The C{twistd meteredrt} plugin.

Only the service maker is assigned here: twistd imports every plugin module on
every run, so the real work stays lazily behind C{meteredrt.tap}.
"""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "meteredrt",
    "meteredrt.tap",
    "Metered Realtime Messaging compatible server (WebSocket + REST).",
    "meteredrt",
)

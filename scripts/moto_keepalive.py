"""moto (every service, as `moto_server` serves it) under waitress, which keeps HTTP/1.1
connections alive as AWS's endpoints do. moto_server's werkzeug development server answers
every request with `Connection: close`, so an SDK that pools connections (the AWS SDK for Rust)
would pay a new TCP connection per call there and nowhere in production. Benchmarks only.

    python moto_keepalive.py PORT
"""

import os
import sys

import waitress
from moto.server import DomainDispatcherApplication, create_backend_app

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    port = int(sys.argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    waitress.serve(app, host="127.0.0.1", port=port, threads=4, _quiet=True)

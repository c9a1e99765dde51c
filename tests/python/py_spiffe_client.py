"""Fetches identities from a Mayfly agent with py-spiffe (the Python SPIFFE
library, over grpcio), and prints what it got as JSON. Used by the e2e test
`python_client.rs`: grpcio sends the socket path, percent-encoded, as the
HTTP/2 :authority, which the agent must accept."""

import json
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    socket = sys.argv[1]
    audience = sys.argv[2]
    client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=20)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    jwt = client.fetch_jwt_svid(audience={audience})
    validated = client.validate_jwt_svid(jwt.token, audience)
    print(json.dumps({
        "x509_spiffe_id": str(svid.spiffe_id),
        "chain_len": len(svid.cert_chain),
        "bundle_trust_domains": sorted(str(td) for td in bundles._bundles.keys()) if hasattr(bundles, "_bundles") else [],
        "jwt_spiffe_id": str(jwt.spiffe_id),
        "validated_spiffe_id": str(validated.spiffe_id),
    }))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

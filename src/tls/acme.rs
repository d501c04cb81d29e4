//! Automatic certificates (ACME, RFC 8555): being written on the `acme` branch; until it is
//! merged an `[app.tls.acme]` app has no certificate and refuses handshakes with an alert.

// Minimal stand-in for github.com/Keyfactor/ejbca-go-client-sdk, used only to
// build SPIRE from source. It declares just the API surface that SPIRE's
// EJBCA UpstreamAuthority plugin refers to; every operation fails. The lab
// never configures that plugin.
module github.com/Keyfactor/ejbca-go-client-sdk

go 1.22

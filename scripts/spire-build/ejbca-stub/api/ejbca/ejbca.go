// Package ejbca is a build-only stand-in for the EJBCA REST client used by
// SPIRE's "ejbca" UpstreamAuthority plugin. It provides the types and
// functions the plugin refers to so that spire-server compiles; every
// operation returns ErrUnavailable. Configuring the EJBCA UpstreamAuthority
// with a server built against this package fails at configure time.
package ejbca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
)

// ErrUnavailable is returned by every operation of this package.
var ErrUnavailable = errors.New("EJBCA upstream authority is not available in this build")

// Authenticator supplies the HTTP client used to reach EJBCA.
type Authenticator interface {
	HTTPClient() (*http.Client, error)
}

// MTLSAuthenticatorBuilder collects mTLS material; Build always fails.
type MTLSAuthenticatorBuilder struct{}

// NewMTLSAuthenticatorBuilder returns a builder whose Build fails.
func NewMTLSAuthenticatorBuilder() *MTLSAuthenticatorBuilder {
	return &MTLSAuthenticatorBuilder{}
}

// WithClientCertificate ignores its argument.
func (b *MTLSAuthenticatorBuilder) WithClientCertificate(*tls.Certificate) *MTLSAuthenticatorBuilder {
	return b
}

// WithCaCertificates ignores its argument.
func (b *MTLSAuthenticatorBuilder) WithCaCertificates([]*x509.Certificate) *MTLSAuthenticatorBuilder {
	return b
}

// Build returns ErrUnavailable.
func (b *MTLSAuthenticatorBuilder) Build() (Authenticator, error) {
	return nil, ErrUnavailable
}

// Configuration holds client settings.
type Configuration struct {
	Host          string
	authenticator Authenticator
}

// NewConfiguration returns an empty configuration.
func NewConfiguration() *Configuration {
	return &Configuration{}
}

// SetAuthenticator records the authenticator.
func (c *Configuration) SetAuthenticator(a Authenticator) {
	c.authenticator = a
}

// APIClient exposes the certificate API.
type APIClient struct {
	V1CertificateApi *V1CertificateApiService
}

// NewAPIClient returns ErrUnavailable.
func NewAPIClient(*Configuration) (*APIClient, error) {
	return nil, ErrUnavailable
}

// V1CertificateApiService is the certificate enrollment API.
type V1CertificateApiService struct{}

// EnrollPkcs10Certificate returns a request whose Execute fails.
func (s *V1CertificateApiService) EnrollPkcs10Certificate(ctx context.Context) ApiEnrollPkcs10CertificateRequest {
	return ApiEnrollPkcs10CertificateRequest{ctx: ctx}
}

// ApiEnrollPkcs10CertificateRequest is a pending enrollment call.
type ApiEnrollPkcs10CertificateRequest struct {
	ctx     context.Context
	request *EnrollCertificateRestRequest
}

// EnrollCertificateRestRequest sets the request body.
func (r ApiEnrollPkcs10CertificateRequest) EnrollCertificateRestRequest(body EnrollCertificateRestRequest) ApiEnrollPkcs10CertificateRequest {
	r.request = &body
	return r
}

// Execute returns ErrUnavailable.
func (r ApiEnrollPkcs10CertificateRequest) Execute() (*CertificateRestResponse, *http.Response, error) {
	return nil, nil, ErrUnavailable
}

// EnrollCertificateRestRequest is the body of an enrollment call.
type EnrollCertificateRestRequest struct {
	Username                 *string
	Password                 *string
	CertificateRequest       *string
	CertificateAuthorityName *string
	CertificateProfileName   *string
	EndEntityProfileName     *string
	IncludeChain             *bool
	AccountBindingId         *string
}

// NewEnrollCertificateRestRequest returns an empty request body.
func NewEnrollCertificateRestRequest() *EnrollCertificateRestRequest {
	return &EnrollCertificateRestRequest{}
}

// SetUsername sets Username.
func (o *EnrollCertificateRestRequest) SetUsername(v string) { o.Username = &v }

// SetPassword sets Password.
func (o *EnrollCertificateRestRequest) SetPassword(v string) { o.Password = &v }

// SetCertificateRequest sets CertificateRequest.
func (o *EnrollCertificateRestRequest) SetCertificateRequest(v string) { o.CertificateRequest = &v }

// SetCertificateAuthorityName sets CertificateAuthorityName.
func (o *EnrollCertificateRestRequest) SetCertificateAuthorityName(v string) {
	o.CertificateAuthorityName = &v
}

// SetCertificateProfileName sets CertificateProfileName.
func (o *EnrollCertificateRestRequest) SetCertificateProfileName(v string) {
	o.CertificateProfileName = &v
}

// SetEndEntityProfileName sets EndEntityProfileName.
func (o *EnrollCertificateRestRequest) SetEndEntityProfileName(v string) {
	o.EndEntityProfileName = &v
}

// SetIncludeChain sets IncludeChain.
func (o *EnrollCertificateRestRequest) SetIncludeChain(v bool) { o.IncludeChain = &v }

// SetAccountBindingId sets AccountBindingId.
func (o *EnrollCertificateRestRequest) SetAccountBindingId(v string) { o.AccountBindingId = &v }

// CertificateRestResponse is the result of an enrollment call.
type CertificateRestResponse struct {
	Certificate      *string
	CertificateChain []string
	ResponseFormat   *string
}

// GetCertificate returns Certificate or "".
func (o *CertificateRestResponse) GetCertificate() string {
	if o == nil || o.Certificate == nil {
		return ""
	}
	return *o.Certificate
}

// GetResponseFormat returns ResponseFormat or "".
func (o *CertificateRestResponse) GetResponseFormat() string {
	if o == nil || o.ResponseFormat == nil {
		return ""
	}
	return *o.ResponseFormat
}

// GenericOpenAPIError is an error carrying an HTTP response body.
type GenericOpenAPIError struct {
	body  []byte
	error string
}

// Error returns the error message.
func (e GenericOpenAPIError) Error() string { return e.error }

// Body returns the raw response body.
func (e GenericOpenAPIError) Body() []byte { return e.body }

// The OpenID provider the auth tests take their tokens from: node-oidc-provider
// (https://github.com/panva/node-oidc-provider) on 127.0.0.1, issuing WLCG-profile JWT
// access tokens by the client-credentials grant. Each client is one test identity; its
// token carries `wlcg.groups` (the VO and, for a manager, the production group), its
// scopes, and `preferred_username`. The resource `urn:prodsys` (the default) is the audience
// prodsys checks; `urn:other` yields a real token for another audience.
//
//   PORT        port to listen on (0 picks one); the issuer URL is printed on stdout
//   AUDIENCE    audience of the prodsys resource (default: prodsys)
import Provider from 'oidc-provider';
import { generateKeyPairSync } from 'node:crypto';

const port = Number(process.env.PORT ?? 0);
const audience = process.env.AUDIENCE ?? 'prodsys';
const ALL = 'compute.create compute.read compute.cancel storage.read';
const CTA = '/vo.cta.in2p3.fr';
const KM3NET = '/km3net.org';

// client id -> [groups, allowed scopes, preferred name]
const identities = {
  'cta-alice': [[CTA], ALL, 'Alice'],
  'cta-bob': [[CTA], ALL, 'Bob'],
  'cta-manager': [[CTA, `${CTA}/production`], ALL, 'Manager'],
  'cta-reader': [[CTA], 'compute.read', 'Reader'],
  'km3net-carol': [[KM3NET], ALL, 'Carol'],
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'prodsys-test-1', use: 'sig', alg: 'RS256' };

const server = (await import('node:http')).createServer();
await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: Object.entries(identities).map(([id, [, scope]]) => ({
    client_id: id,
    client_secret: `secret-${id}`,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope,
  })),
  scopes: ALL.split(' '),
  jwks: { keys: [jwk] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:prodsys',
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => {
        if (resource !== 'urn:prodsys' && resource !== 'urn:other') {
          throw new Provider.errors.InvalidTarget();
        }
        return {
          scope: ALL,
          audience: resource === 'urn:prodsys' ? audience : 'other',
          accessTokenTTL: 3600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: (_ctx, token) => {
    const [groups, , name] = identities[token.clientId] ?? [[], '', ''];
    return { 'wlcg.groups': groups, preferred_username: name, wlcg: { ver: '1.0' } };
  },
});
provider.proxy = false;
server.on('request', provider.callback());
process.stdout.write(`${issuer}\n`);

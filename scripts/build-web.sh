#!/usr/bin/env bash
# Vendors the browser's MQTT client (MQTT.js) and Swagger UI (for /docs, which must work without
# internet), both pinned in web/package-lock.json, into the package.
# The output is committed, so installing mqchat needs no npm; run this only to change the version:
#   edit web/package.json, `cd web && npm install --package-lock-only`, then scripts/build-web.sh
set -euo pipefail
cd "$(dirname "$0")/../web"

npm ci --no-audit --no-fund --ignore-scripts

vendor=../mqchat/api/static/vendor
mkdir -p "$vendor"
cp node_modules/mqtt/dist/mqtt.min.js "$vendor/mqtt.min.js"
cp node_modules/mqtt/LICENSE.md "$vendor/MQTT.js-LICENSE.md"
node notices.js > "$vendor/THIRD-PARTY-NOTICES.txt"
version=$(node -p 'require("./node_modules/mqtt/package.json").version')
echo "$version" > "$vendor/MQTT.js-VERSION"
echo "vendored MQTT.js $version into mqchat/api/static/vendor/"

swagger=$vendor/swagger-ui
mkdir -p "$swagger"
for file in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png LICENSE NOTICE; do
    cp "node_modules/swagger-ui-dist/$file" "$swagger/$file"
done
# The bundle's last line points at a source map that is not shipped.
sed -i '/^\/\/# sourceMappingURL=/d' "$swagger/swagger-ui-bundle.js"
swagger_version=$(node -p 'require("./node_modules/swagger-ui-dist/package.json").version')
echo "$swagger_version" > "$swagger/VERSION"
echo "vendored Swagger UI $swagger_version into mqchat/api/static/vendor/swagger-ui/"

// Starts Swagger UI on /docs from the vendored bundle: no CDN, no inline script (the page's CSP).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Otherwise Swagger UI asks validator.swagger.io about the schema (a request off this host).
    validatorUrl: null,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});

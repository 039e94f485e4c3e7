# Heroku runs this at dyno start: the service-account key kept in the GOOGLE_CREDENTIALS
# config var becomes the file Application Default Credentials read.
if [ -n "${GOOGLE_CREDENTIALS:-}" ]; then
  umask 077
  printf '%s' "$GOOGLE_CREDENTIALS" > "$HOME/google-credentials.json"
  export GOOGLE_APPLICATION_CREDENTIALS="$HOME/google-credentials.json"
fi

/*
 * Zebu's memory addon (built at install time into build/memory.node by scripts/build-native.sh):
 * one call Node lacks, glibc's malloc_trim. Node allocates Buffer memory with malloc; after a
 * burst of I/O the freed chunks stay in the process's heap (glibc returns only the top of the
 * heap on its own), so a data-path process that served a load keeps tens of MiB it no longer
 * uses. malloc_trim(0) hands every free page back to the kernel (madvise), wherever it lies.
 */
#include <malloc.h>
#include <node_api.h>

static napi_value trim_malloc(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value result;
  if (napi_get_boolean(env, malloc_trim(0) != 0, &result) != napi_ok) return NULL;
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "trimMalloc", NAPI_AUTO_LENGTH, trim_malloc, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "trimMalloc", fn) != napi_ok) return NULL;
  return exports;
}

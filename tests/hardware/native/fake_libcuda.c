/* A stand-in for libcuda.so.1 with the driver API calls scripts/check-nvidia-host makes.
 *
 * Devices come from FAKE_CUDA_DEVICES: entries separated by ';', each
 * "busid|name|uuid as 32 hex digits|total bytes|major|minor". FAKE_CUDA_INIT_ERROR makes
 * cuInit return that CUresult. Built by the tests with the system C compiler. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEVICES 16
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_INVALID_DEVICE 101

typedef struct {
    char bus_id[32];
    char name[128];
    unsigned char uuid[16];
    size_t total;
    int major, minor;
} device_t;

static device_t devices[MAX_DEVICES];
static int device_count = -1;

static int parse(void) {
    const char *spec = getenv("FAKE_CUDA_DEVICES");
    device_count = 0;
    if (spec == NULL) return 0;
    char *copy = strdup(spec), *save = NULL;
    for (char *entry = strtok_r(copy, ";", &save); entry && device_count < MAX_DEVICES;
         entry = strtok_r(NULL, ";", &save)) {
        device_t *d = &devices[device_count];
        char uuid[33] = {0};
        if (sscanf(entry, "%31[^|]|%127[^|]|%32[^|]|%zu|%d|%d", d->bus_id, d->name, uuid,
                   &d->total, &d->major, &d->minor) != 6) {
            free(copy);
            return CUDA_ERROR_INVALID_VALUE;
        }
        for (int i = 0; i < 16; i++) sscanf(uuid + 2 * i, "%2hhx", &d->uuid[i]);
        device_count++;
    }
    free(copy);
    return 0;
}

int cuInit(unsigned int flags) {
    const char *error = getenv("FAKE_CUDA_INIT_ERROR");
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (error != NULL) return atoi(error);
    return parse();
}

int cuGetErrorString(int error, const char **text) {
    *text = error == 100 ? "no CUDA-capable device is detected" : "fake error";
    return 0;
}

int cuDeviceGetCount(int *count) {
    if (device_count < 0) return CUDA_ERROR_NOT_INITIALIZED;
    *count = device_count;
    return 0;
}

int cuDeviceGet(int *device, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return 0;
}

int cuDeviceGetPCIBusId(char *out, int length, int device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(out, (size_t)length, "%s", devices[device].bus_id);
    return 0;
}

int cuDeviceGetName(char *out, int length, int device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(out, (size_t)length, "%s", devices[device].name);
    return 0;
}

int cuDeviceTotalMem_v2(size_t *bytes, int device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = devices[device].total;
    return 0;
}

int cuDeviceGetUuid(unsigned char *uuid, int device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    memcpy(uuid, devices[device].uuid, 16);
    return 0;
}

int cuDeviceGetAttribute(int *value, int attribute, int device) {
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    if (attribute == 75) *value = devices[device].major;
    else if (attribute == 76) *value = devices[device].minor;
    else return CUDA_ERROR_INVALID_VALUE;
    return 0;
}
